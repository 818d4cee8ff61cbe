"""One-time AWS setup for cluster/gpu.yaml: a locked-down security group and two IAM instance profiles.

    python cluster/aws_setup.py --dry-run          # print what would be created, touch nothing
    python cluster/aws_setup.py --write-config     # create/update, then write the group id into gpu.yaml

Why: `ray up` on AWS creates a security group with SSH open to 0.0.0.0/0 for any node type without
SecurityGroupIds, and gives the head node EC2 and S3 *full* access. This script creates instead
  * security group <cluster_name>-sg: TCP 22 from metadata.gradalign.ssh_cidr only, and all
    traffic between members of the group (Ray's own ports). Existing ingress rules are replaced.
  * instance profile gradalign-ray-worker: read/write on the results bucket (GRADALIGN_STORAGE) only.
  * instance profile gradalign-ray-head: the same bucket, AmazonEC2FullAccess to launch and stop workers
    (what Ray's default role has), iam:PassRole for the worker role only, and ssm:GetParameters for the
    public DLAMI parameter that gpu.yaml's ImageId resolves.
Values come from the cluster yaml (region, ssh_cidr, GRADALIGN_STORAGE); flags override them.
Needs boto3 and AWS credentials allowed to manage EC2 security groups and IAM roles. Idempotent.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate import check_ssh_cidr, load_documents, storage_settings

GPU_YAML = Path(__file__).resolve().parent / "gpu.yaml"
SG_PLACEHOLDER = "sg-REPLACE-WITH-AWS-SETUP-OUTPUT"
HEAD_ROLE = "gradalign-ray-head"
WORKER_ROLE = "gradalign-ray-worker"
EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def ingress_rules(group_id: str, ssh_cidr: str) -> list[dict]:
    """SSH from ssh_cidr; everything between members of the group. Refuses a world-open CIDR."""
    problems = check_ssh_cidr(ssh_cidr, allow_placeholder=False)
    if problems:
        raise ValueError("; ".join(problems))
    return [
        {
            "IpProtocol": "tcp",
            "FromPort": 22,
            "ToPort": 22,
            "IpRanges": [{"CidrIp": ssh_cidr, "Description": "SSH for ray up / attach / dashboard"}],
        },
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id, "Description": "Ray cluster nodes"}]},
    ]


def bucket_of(storage: str) -> tuple[str, str]:
    """('bucket', 'prefix') of an s3:// URI."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", storage)
    if not match:
        raise ValueError(f"GRADALIGN_STORAGE {storage!r} is not an s3:// URI")
    return match[1], match[2].strip("/")


def bucket_policy(bucket: str, prefix: str) -> dict:
    """Read/write/delete under s3://bucket/prefix, list the bucket; nothing else."""
    objects = f"arn:aws:s3:::{bucket}/{prefix + '/' if prefix else ''}*"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                "Resource": f"arn:aws:s3:::{bucket}",
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                "Resource": objects,
            },
        ],
    }


def head_extra_policy(worker_role_arn: str) -> dict:
    """What the head needs beyond EC2: hand the worker role to new workers, resolve the DLAMI id."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iam:PassRole", "Resource": worker_role_arn},
            {
                "Effect": "Allow",
                "Action": ["ssm:GetParameters", "ssm:GetParameter"],
                "Resource": "arn:aws:ssm:*::parameter/aws/service/deeplearning/*",
            },
        ],
    }


def plan(config: dict, ssh_cidr: str | None, storage: str | None, region: str | None) -> dict:
    """Everything the script would create, as plain data (no AWS calls)."""
    ssh_cidr = ssh_cidr or config.get("metadata", {}).get("gradalign", {}).get("ssh_cidr")
    settings = storage_settings(config)
    storage = storage or (settings[0] if settings else None)
    if not storage:
        raise ValueError("no GRADALIGN_STORAGE in the config and no --storage")
    bucket, prefix = bucket_of(storage)
    if re.search(r"YOUR|REPLACE", bucket):
        raise ValueError(f"set GRADALIGN_STORAGE in the cluster yaml (or --storage): {storage!r} is a placeholder")
    return {
        "region": region or config["provider"]["region"],
        "security_group": {"name": f"{config['cluster_name']}-sg", "ingress": ingress_rules("<this group>", ssh_cidr)},
        "bucket": bucket,
        "roles": {
            WORKER_ROLE: {"inline": {"gradalign-results": bucket_policy(bucket, prefix)}, "managed": []},
            HEAD_ROLE: {
                "inline": {
                    "gradalign-results": bucket_policy(bucket, prefix),
                    "gradalign-launch-workers": head_extra_policy(f"<arn of {WORKER_ROLE}>"),
                },
                "managed": ["arn:aws:iam::aws:policy/AmazonEC2FullAccess"],
            },
        },
    }


def ensure_security_group(ec2, name: str, vpc_id: str | None, ssh_cidr: str) -> str:
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise SystemExit("no default VPC in this region: pass --vpc-id")
        vpc_id = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    )["SecurityGroups"]
    if found:
        group_id, current = found[0]["GroupId"], found[0]["IpPermissions"]
        if current:
            ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=current)
    else:
        group_id = ec2.create_security_group(
            GroupName=name,
            VpcId=vpc_id,
            Description="GradAlign Ray cluster: SSH from one CIDR, intra-cluster",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": [{"Key": "project", "Value": "gradalign"}]}],
        )["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=ingress_rules(group_id, ssh_cidr))
    return group_id


def ensure_role_and_profile(iam, name: str, inline: dict, managed: list[str]) -> str:
    """Create or update role `name` and instance profile `name`; return the role ARN."""
    try:
        arn = iam.get_role(RoleName=name)["Role"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        arn = iam.create_role(
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(EC2_TRUST),
            Description="GradAlign Ray cluster (cluster/aws_setup.py)",
        )["Role"]["Arn"]
    for policy_name, document in inline.items():
        iam.put_role_policy(RoleName=name, PolicyName=policy_name, PolicyDocument=json.dumps(document))
    for policy_arn in managed:
        iam.attach_role_policy(RoleName=name, PolicyArn=policy_arn)
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if not any(role["RoleName"] == name for role in profile["Roles"]):
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        time.sleep(15)  # IAM is eventually consistent; EC2 rejects a profile it cannot see yet
    return arn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=GPU_YAML, help="cluster yaml (default: cluster/gpu.yaml)")
    parser.add_argument("--ssh-cidr", help="override metadata.gradalign.ssh_cidr, e.g. 203.0.113.7/32")
    parser.add_argument("--storage", help="override GRADALIGN_STORAGE, e.g. s3://my-bucket/gradalign")
    parser.add_argument("--region", help="override provider.region")
    parser.add_argument("--vpc-id", help="VPC for the security group (default: the region's default VPC)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit")
    parser.add_argument(
        "--write-config", action="store_true", help=f"replace {SG_PLACEHOLDER} in the config with the security group id"
    )
    args = parser.parse_args(argv)

    config = load_documents(args.config)[0]
    try:
        todo = plan(config, args.ssh_cidr, args.storage, args.region)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(todo, indent=2))
        return 0

    import boto3

    ec2, iam = boto3.client("ec2", region_name=todo["region"]), boto3.client("iam")
    ssh_cidr = todo["security_group"]["ingress"][0]["IpRanges"][0]["CidrIp"]
    group_id = ensure_security_group(ec2, todo["security_group"]["name"], args.vpc_id, ssh_cidr)
    worker = todo["roles"][WORKER_ROLE]
    worker_arn = ensure_role_and_profile(iam, WORKER_ROLE, worker["inline"], worker["managed"])
    head = todo["roles"][HEAD_ROLE]
    head["inline"]["gradalign-launch-workers"] = head_extra_policy(worker_arn)
    ensure_role_and_profile(iam, HEAD_ROLE, head["inline"], head["managed"])

    print(
        f"security group {group_id} ({todo['security_group']['name']}): tcp/22 from {ssh_cidr}, "
        "all traffic inside the group"
    )
    print(f"instance profiles {HEAD_ROLE}, {WORKER_ROLE}: bucket {todo['bucket']}")
    text = args.config.read_text()
    if args.write_config and SG_PLACEHOLDER in text:
        args.config.write_text(text.replace(SG_PLACEHOLDER, group_id))
        print(f"wrote {group_id} into {args.config}")
    elif group_id not in text:
        print(f'now set SecurityGroupIds to ["{group_id}"] in {args.config}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
